from onionpost.app.cli import main

main()
