"""Evaluation: what labelled rows are worth, from each part's additive counts (tally, metrics;
multilabel for sets of labels) to the run's metrics, report.md and report.html (report,
report_markdown, report_html); the confidence a row can be trusted at (calibration,
abstain), the rows a person should see (review), and drift against a baseline run
(monitor). Nothing here loads a model or reads the input."""
