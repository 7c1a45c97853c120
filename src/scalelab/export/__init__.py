"""Take trained runs out of scalelab: Hugging Face model directories (`export.hf`)."""
