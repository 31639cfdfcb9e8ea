//! Hugging Face BERT-family checkpoints (in progress).
