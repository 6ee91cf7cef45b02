"""llmrelay's gateway: contract -> servicer -> router -> backends -> tokenizer and usage ledger."""
