"""Examples of bringing your own model to stbench (`--arch examples.MODULE:FACTORY`)."""
