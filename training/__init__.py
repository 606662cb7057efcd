"""Host side, torch: ``edgelora train``, a PEFT LoRA adapter from prompt/completion pairs (``trainer``)."""
