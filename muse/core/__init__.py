"""The serving core: the service (the one door), tickets, batching policy, estimates, autoscaling, limits, metrics.

Never imports Starlette; reaches workers only through the pool Protocol.
"""
