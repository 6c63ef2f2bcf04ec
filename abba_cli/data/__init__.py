"""Where training and evaluation examples come from and how they become tokens.

recipes (+ recipe_schema, derive): the YAML recipes in abba_cli/recipes/ and the rows they turn into examples;
sources, provenance: which copy of the data is read (local file, hub, bundled) and a record of it;
formats, prompts, latex: row types of the chat/text/tokenized formats, the one prompt renderer, MATH's \\boxed;
tokenize, collate, cache: tokens and label masks, padded batches, the tokenized-data cache;
training_set: a run's training and validation sets; order: the seeded order training reads them in.
"""
