"""EGT Explorer Streamlit app: `streamlit run app/streamlit_app.py`."""
