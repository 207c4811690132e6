"""GPT (Llama-family) model code, layer specs (torch | Transformer Engine) and Hugging Face state-dict adapters."""
