"""What the ``ctgen`` CLI and the workflow's rules call: training, encoding, text, sampling, evaluation, figures."""
