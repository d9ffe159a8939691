"""Step 0: exact ground truth. Small token MDPs solved exactly (q*, v*, pi*), and tabular fits against them."""
