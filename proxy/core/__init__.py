"""Sans-IO protocol cores: bytes in, decisions or events out. No asyncio, no sockets; time is a parameter."""
