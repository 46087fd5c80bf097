"""TensorRT: engine building and the offline compatibility check."""
