"""Host side, torch: PEFT adapters in (``peft_ingest``), ONNX graphs with LoRA slots out (``slots``,
``causal_lm``, ``encoder``, then ``fusion``, ``packing``, ``slot_codec``, ``base_quant``), written as
packages by ``export`` and ``add_adapter``."""
