"""The eval stage: the trained model and its compressed variants scored with lm-evaluation-harness."""
