"""A small invoicing app: the sample workspace the demo memorises."""
