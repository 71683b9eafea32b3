"""Where results are shown: matplotlib figures, TensorBoard, the HTML report."""
