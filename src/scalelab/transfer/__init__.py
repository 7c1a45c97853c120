"""scalelab.transfer."""
