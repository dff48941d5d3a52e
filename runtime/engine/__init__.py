"""Generation: the engine that runs prefill and decode (`generate`), the decode step captured as a CUDA
graph (`decode_graph`) and sampling on the device (`sampling`)."""
