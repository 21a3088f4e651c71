"""Training, evaluation and fine-tuning of the nodule model: never imported by serving code."""
