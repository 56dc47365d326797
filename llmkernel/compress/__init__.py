"""compress: make a trained model smaller or faster (quantize, prune, distill), measured against its source."""
