"""Step 7: looking at what the model values: per-token Q, V, A tables, plotly figures, the ipywidgets explorer,
and the one figure style every figure shares (:mod:`shiq_lab.views.style`)."""
