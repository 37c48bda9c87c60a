"""sails_bootstrap."""
