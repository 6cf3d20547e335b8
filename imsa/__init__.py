"""imsa: temporary AWS credentials from one MFA session, served over the EC2 instance metadata API."""

__version__ = "0.1.0"
