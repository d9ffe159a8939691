"""Figures, the token-value explorer and the shared figure style (issue 9 layout: ``shiq_lab.views``)."""
