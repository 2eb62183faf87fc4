"""Training rows: the ArrayRecord row format, packing documents into rows, and the Grain loader."""
