"""Fixtures shared by the deploy tests: an Orthanc factory and a node routed to by Orthanc
(defined beside the routing test that introduced them)."""
from tests.deploy.test_orthanc_routing import node, orthanc_factory

__all__ = ["node", "orthanc_factory"]
