"""The worker side: a subprocess that loads one pipeline on one device and runs batches.

Never imports asyncio or Starlette.
"""
