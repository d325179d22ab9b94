"""Request routers: protocols that terminate client connections and route each request."""
