"""Data for LaTRO: tasks (`Task`: GSM8K, ARC-Challenge, the synthetic arithmetic and the user's own,
as Examples), prompts (chat-formatted token ids, answer suffixes, stops), extraction (answers from
generated text, the answer rules, majority votes)."""
