"""Text in and out: the SentencePiece tokenizer with CodeLlama's infill and Instruct formats (`tokenizer`),
the proto edit that hides unused pieces (`sp_model`) and the streaming detokenizer (`detokenize`)."""
