"""Federated training across sites on Flower (``pip install 'medpipe-imaging[fl]'``).

    medpipe fl certs --out CERTS --sites a,b,c            # CA, server TLS certificate, per-site keys
    medpipe fl server --out RUN --certs CERTS --site-keys CERTS/sites/*.pub --rounds 5 --min-sites 2
    medpipe fl site --data SITE_DATA --server HOST:9092 --ca CERTS/ca.crt --key CERTS/sites/a
    medpipe fl partition --data DATA --out SITES --sites 3 --dirichlet 0.5   # one-machine experiments

Modules: ``certs`` (credentials), ``partition`` (simulation splits), ``site`` (a site's local training
and evaluation through the training engine), ``aggregate`` (the checks of every site reply, FedAvg
and the robust median / trimmed-mean aggregation, pooled metrics; docs/federated-security.md),
``server`` (the round loop inside the ServerApp), ``apps`` (Flower ServerApp/ClientApp), ``deploy``
(starting the SuperLink/SuperNode processes), ``cli``.
"""
