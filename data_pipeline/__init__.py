"""The data room: raw records in, typed micro-batches out (docs/ARCHITECTURE.md).

    ingest/     files -> raw records -> Conversation / TextDocument (readers, formats)
    render/     Conversation -> text + trained spans -> token ids + loss mask (templates, encoding)
    store/      the machinery of `prepare`: worker pool, memory-mapped shards, manifests
    selection/  which samples train: held-out splits, deduplication
    schedule/   the global mixture schedule, packing, collation, MicroBatch

The two commands live at the top: `python -m data_pipeline.prepare` and
`python -m data_pipeline.inspect`; spec.py (the typed data config) and errors.py are shared by
every room. data_pipeline never imports engine or launcher.
"""
