"""`stbench predict`: the real training step on fake tensors -> peak memory and step time on a named GPU."""
