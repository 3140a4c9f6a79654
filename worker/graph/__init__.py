"""The edge toward Microsoft: adapters that implement the core's ports.

The httpx Graph client (`InviteSender`), the aiohttp transport it sends through, and MSAL's
app-only tokens (`TokenProvider`). Third-party errors become the core's exceptions here.
"""
