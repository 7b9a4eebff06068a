"""Outbound connectors: consumers of ``commands.<target>`` that act on the system owning the record.

``consumer.py`` runs the loop (decode, dispatch, retry, reject to ``exceptions.<owner>``, commit);
``base.py`` is the Target interface every backend implements; ``sandbox.py`` (SQLite / PostgreSQL),
``stripe_target.py`` (billing), ``salesforce_target.py`` and ``hubspot_target.py`` (CRM) and ``http_target.py``
are the backends; ``cli.py`` adds ``concord adapters``.
"""
