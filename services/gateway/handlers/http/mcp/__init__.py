"""The MCP endpoint (``/mcp``): the gateway's operations as tools for agents."""
