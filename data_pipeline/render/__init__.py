"""Render: a Conversation becomes one text plus the character spans that train, by the mask
rule (rendering), through built-in or Jinja chat templates (templates, builtin_templates,
jinja_template), with reasoning (reasoning) and special-token text kept plain (special_text);
encoding turns spans into a per-token mask and truncates at whole messages; tokenizer loads and
trains tokenizers."""
