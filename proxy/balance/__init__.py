"""Choosing an endpoint for a backend (ref 3.9, 4, 10.2).

``ewma``      peak-EWMA load of one endpoint (sans-IO)
``p2c``       the endpoint set, readiness/backoff, power-of-two-choices pick (sans-IO)
``failfast``  the per-backend failfast state machine (sans-IO)
``queue``     the asyncio wait for a ready endpoint: capacity (LoadShed) and failfast (FailFast)
``budget``    the retry budget and the retryability rule (sans-IO)
``split``     weighted traffic splits between backends (sans-IO)
"""
