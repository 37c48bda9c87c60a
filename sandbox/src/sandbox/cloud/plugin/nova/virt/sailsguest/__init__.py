"""Re-export of the sandbox's compute driver under nova.virt, where nova looks for drivers."""

from sails_cloud_plugins.nova_driver import SandboxGuestDriver

__all__ = ["SandboxGuestDriver"]
