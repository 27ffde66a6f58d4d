"""The run: one classify run from its shards to its manifest, in the order a row meets it.

pipeline.run_classify is the straight line: the shards checked (prepare), Ray joined or
started and the job placed (placement), the output locked (lock) and what an earlier attempt
finished skipped (resume, duplicates), then the Ray Data graph (stages: read and prepare,
each stage's actor pool, cascade for more than one stage, write), and the run's manifest and
closing table (summary). What the rows are labelled with lives in clsjob.backends; what a
labelled part is worth, in clsjob.evaluation."""
