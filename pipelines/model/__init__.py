"""Model building blocks: the tiny Llama family, the tokenizer, Hugging Face export."""
