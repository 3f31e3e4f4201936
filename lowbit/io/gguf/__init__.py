"""GGUF, llama.cpp's file format: the container (file), architectures as data (arch), the reader (read),
the writer (write), tokenizer conversion (tokenizer), llama-quantize's per-tensor types (mixtures),
GGML blocks as QTensors (qtensor) and the calibrated export (calibrated)."""
