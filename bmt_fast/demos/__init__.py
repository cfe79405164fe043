"""Small runnable demonstrations of bmt_fast."""
