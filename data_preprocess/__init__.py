"""data_preprocess: command-line tools that turn raw corpora into token files and index maps."""
