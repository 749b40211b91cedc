"""Where stages run: in this process (`local`) or over a Ray cluster (`dispatch`)."""
