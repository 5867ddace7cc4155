"""Cloud–device collaboration: uplink selection (UTS), the weight-update codec (DWC) and the service between them."""
