"""Data for LaTRO: tasks (GSM8K, ARC-Challenge examples), prompts (chat-formatted token ids,
answer suffixes, stops), extraction (answers from generated text, correctness, majority votes)."""
