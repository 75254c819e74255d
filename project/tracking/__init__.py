"""MLflow tracking (``tracker``), with an offline journal (``journal``) that keeps what could not be
logged while the server was away and sends it when it is back."""
