from sluice.service import run_service

from services.gateway.app import main

if __name__ == "__main__":
    run_service(main)
