from llmrelay_server.cli import main

main()
