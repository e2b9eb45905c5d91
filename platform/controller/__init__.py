"""The job controller: plan, provision, train, promote, release, serve (platform.controller.state)."""
