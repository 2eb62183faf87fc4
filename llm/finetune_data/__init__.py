"""Fine-tuning data: chat SFT, DPO preference pairs and sentiment prompt-tuning rows, in the training row
format (llm/data/records.py)."""
