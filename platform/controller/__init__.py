"""The job controller: provision, train, reconcile nodes, tear down."""
